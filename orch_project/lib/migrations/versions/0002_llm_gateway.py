"""LLM gateway: routing decisions, repairs, reservations and cost in the call ledger; semantic cache
text; circuit breaker state; token budgets

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table('llm_calls', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cache_kind', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('route_rank', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('route_reason', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('repair', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('reserved_tokens', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('cost_usd', sa.Float(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('day', sa.String(length=10), nullable=True))
        batch_op.create_index('ix_llm_calls_model_created', ['provider', 'model', 'created_at'], unique=False)

    with op.batch_alter_table('llm_cache', schema=None) as batch_op:
        batch_op.add_column(sa.Column('input_text', sa.Text(), nullable=True))
        batch_op.create_index('ix_llm_cache_task_model', ['task', 'model', 'prompt_version'], unique=False)

    op.create_table(
        'circuit_breakers',
        sa.Column('key', sa.String(length=200), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('failures', sa.Integer(), server_default='0', nullable=False),
        sa.Column('probes', sa.Integer(), server_default='0', nullable=False),
        sa.Column('opened_at', TS, nullable=True),
        sa.Column('last_error', sa.String(length=255), nullable=True),
        sa.Column('updated_at', TS, nullable=False),
        sa.PrimaryKeyConstraint('key'),
    )
    op.create_table(
        'token_budgets',
        sa.Column('scope', sa.String(length=128), nullable=False),
        sa.Column('cap', sa.Integer(), nullable=False),
        sa.Column('used', sa.Integer(), server_default='0', nullable=False),
        sa.Column('reserved', sa.Integer(), server_default='0', nullable=False),
        sa.Column('refused', sa.Integer(), server_default='0', nullable=False),
        sa.Column('cost_usd', sa.Float(), server_default='0', nullable=False),
        sa.Column('updated_at', TS, nullable=False),
        sa.PrimaryKeyConstraint('scope'),
    )


def downgrade() -> None:
    op.drop_table('token_budgets')
    op.drop_table('circuit_breakers')
    with op.batch_alter_table('llm_cache', schema=None) as batch_op:
        batch_op.drop_index('ix_llm_cache_task_model')
        batch_op.drop_column('input_text')
    with op.batch_alter_table('llm_calls', schema=None) as batch_op:
        batch_op.drop_index('ix_llm_calls_model_created')
        for col in ('day', 'cost_usd', 'reserved_tokens', 'repair', 'route_reason', 'route_rank', 'cache_kind'):
            batch_op.drop_column(col)
