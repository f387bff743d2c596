"""index the audit log by flow and time (each step's audit summary reads its own window)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_audit_flow_at', 'audit', ['flow', 'at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_audit_flow_at', table_name='audit')
