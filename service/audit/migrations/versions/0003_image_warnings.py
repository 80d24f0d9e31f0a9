"""audit trail: what decoding and the DICOM header checks noted about each image

One nullable column on ``audit_events`` (issue #32): ``warnings``, the response's ``image.warnings``: what decoding
assumed or converted, and which invalid DICOM header values the derived result objects (SR, result page, heatmaps)
left out, by attribute name, never by value. Records written before this revision have NULL; they read back as
no warnings.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 05:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("warnings")
