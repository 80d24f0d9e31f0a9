"""audit trail: whether each film's intended population was verified, and what was missing

Two nullable columns on ``audit_events`` (issue #27): ``population_verified`` (the response's
``referral.population_verified``) and ``population_missing`` (``referral.population_missing``: "age", "view").
Records written before this revision have NULL in both; they read back as not verified and nothing listed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 21:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("population_verified", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("population_missing", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("population_missing")
        batch.drop_column("population_verified")
