"""flow-scoped keys: several flows share the app database, so item ids and intake source keys are
unique per flow, not globally

- ``items``: primary key (flow, item_id) instead of (item_id);
- ``intake``: primary key (flow, source_key) instead of (source_key);
- ``approvals``: unique (flow, item_id) (``uq_approvals_flow_item``) instead of unique (item_id);
- ``vault``: a nullable ``flow`` column, backfilled from ``items.flow`` by item id (before this
  revision item ids were globally unique, so the join is unambiguous; a vault row whose item is gone
  keeps NULL), and an index (flow, item_id).

Every existing row keeps its values. On SQLite the three tables whose keys change are rebuilt by
Alembic's batch "move and copy" (their indexes are recreated); PostgreSQL alters them in place
(``recreate="auto"``: a rebuild there would drop the serial sequence of ``approvals.id``). The audit
table and its append-only triggers (0005) are not touched.

Downgrade restores the single-column keys and drops ``vault.flow``. It FAILS once two flows hold the
same item id, the same intake source key or an approval for the same item id: it checks for such
rows first and raises before changing anything (they have to be renamed or removed by hand). The
check matters on SQLite, where the driver runs DDL outside the transaction and a rebuild that failed
half-way would leave its ``_alembic_tmp_*`` table behind.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# Applied only to constraints that reflect without a name (SQLite's inline PRIMARY KEY / UNIQUE from
# 0001), so that batch mode can drop them; PostgreSQL reports the real names.
NAMING = {"pk": "pk_%(table_name)s", "uq": "uq_%(table_name)s_%(column_0_name)s"}

# The names PostgreSQL gave the constraints created unnamed by 0001; used for the new keys on every
# dialect so upgrade and downgrade agree.
ITEMS_PK = 'items_pkey'
INTAKE_PK = 'intake_pkey'
APPROVALS_UQ_OLD = 'approvals_item_id_key'
APPROVALS_UQ = 'uq_approvals_flow_item'


def _pk_name(table: str) -> str:
    name = sa.inspect(op.get_bind()).get_pk_constraint(table).get("name")
    return name or NAMING["pk"] % {"table_name": table}


def _unique_name(table: str, columns: list[str]) -> str:
    for uc in sa.inspect(op.get_bind()).get_unique_constraints(table):
        if list(uc["column_names"]) == columns:
            return uc["name"] or NAMING["uq"] % {"table_name": table, "column_0_name": columns[0]}
    raise RuntimeError(f"no unique constraint on {table}({', '.join(columns)})")


def _replace_pk(table: str, new_name: str, columns: list[str]) -> None:
    old = _pk_name(table)
    with op.batch_alter_table(table, naming_convention={"pk": NAMING["pk"]}) as batch_op:
        batch_op.drop_constraint(old, type_='primary')
        batch_op.create_primary_key(new_name, columns)


def _replace_unique(table: str, old_columns: list[str], new_name: str, columns: list[str]) -> None:
    old = _unique_name(table, old_columns)
    with op.batch_alter_table(table, naming_convention={"uq": NAMING["uq"]}) as batch_op:
        batch_op.drop_constraint(old, type_='unique')
        batch_op.create_unique_constraint(new_name, columns)


def upgrade() -> None:
    with op.batch_alter_table('vault') as batch_op:
        batch_op.add_column(sa.Column('flow', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_vault_flow_item', ['flow', 'item_id'], unique=False)

    items = sa.table('items', sa.column('item_id', sa.String), sa.column('flow', sa.String))
    vault = sa.table('vault', sa.column('item_id', sa.String), sa.column('flow', sa.String))
    op.execute(vault.update().values(
        flow=sa.select(items.c.flow).where(items.c.item_id == vault.c.item_id).scalar_subquery()))

    _replace_pk('items', ITEMS_PK, ['flow', 'item_id'])
    _replace_pk('intake', INTAKE_PK, ['flow', 'source_key'])
    _replace_unique('approvals', ['item_id'], APPROVALS_UQ, ['flow', 'item_id'])


def _shared_keys() -> list[str]:
    """The single-column keys that rows of different flows share (the downgrade cannot keep them)."""
    bind = op.get_bind()
    found = []
    for table, column in (('items', 'item_id'), ('intake', 'source_key'), ('approvals', 'item_id')):
        t = sa.table(table, sa.column(column, sa.String))
        q = (sa.select(t.c[column]).group_by(t.c[column]).having(sa.func.count() > 1)
             .order_by(t.c[column]).limit(5))
        found += [f"{table}.{column}={v!r}" for v in bind.execute(q).scalars()]
    return found


def downgrade() -> None:
    """Fails if two flows share an item id, intake source key or approved item id (see above)."""
    shared = _shared_keys()
    if shared:
        raise RuntimeError("cannot downgrade below 0007: rows of different flows share keys that 0006 "
                           "keeps globally unique (rename or remove them first): " + ", ".join(shared))
    _replace_unique('approvals', ['flow', 'item_id'], APPROVALS_UQ_OLD, ['item_id'])
    _replace_pk('intake', INTAKE_PK, ['source_key'])
    _replace_pk('items', ITEMS_PK, ['item_id'])
    with op.batch_alter_table('vault') as batch_op:
        batch_op.drop_index('ix_vault_flow_item')
        batch_op.drop_column('flow')
