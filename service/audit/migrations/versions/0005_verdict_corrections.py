"""audit trail: corrected verdicts and what they replaced

Written from service/audit/models.py (``AuditOutcomeCorrection``) and checked against Alembic's autogenerate
comparison (``tests/audit/test_store.py``): a verdict the radiologist changed after signing it (a FHIR report
amended or corrected, an HL7 result status C, a CSV/NDJSON line with status corrected) replaces the row in
``audit_outcomes``; ``audit_outcome_corrections`` keeps the verdict it replaced, with when and who, so the trail
shows every verdict the watch ever counted.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 11:40:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "audit_outcome_corrections",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("outcome_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("previous_present", sa.Boolean(), nullable=False),
        sa.Column("previous_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("submitted_by", sa.String(length=64), nullable=True),
        sa.Column("message_id", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["outcome_pk"], ["audit_outcomes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_outcome_corrections", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_outcome_corrections_outcome_pk"), ["outcome_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_outcome_corrections_received_at"), ["received_at"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("audit_outcome_corrections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_outcome_corrections_received_at"))
        batch_op.drop_index(batch_op.f("ix_audit_outcome_corrections_outcome_pk"))
    op.drop_table("audit_outcome_corrections")
