"""alerts raised from the design brief's rules and from failed runs

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'alerts',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('flow', sa.String(length=64), nullable=False),
        sa.Column('dedup_key', sa.String(length=255), nullable=False),
        sa.Column('rule', sa.String(length=128), nullable=False),
        sa.Column('metric', sa.String(length=64), nullable=False),
        sa.Column('observed', sa.Float(), nullable=True),
        sa.Column('threshold', sa.Float(), nullable=True),
        sa.Column('source', sa.String(length=128), nullable=False),
        sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('channels', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('dedup_key', name='uq_alerts_dedup_key'),
    )
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index('ix_alerts_flow_created', ['flow', 'created_at'], unique=False)


def downgrade() -> None:
    op.drop_table('alerts')
