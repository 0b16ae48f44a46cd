"""deploys: a label's deploy note, author and client overrides; the deploy history

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('prompt_labels', schema=None) as batch_op:
        batch_op.add_column(sa.Column('note', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('author', sa.String(length=200), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('overrides', sa.JSON(), nullable=False, server_default='[]'))

    op.create_table('prompt_deploys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('label', sa.String(length=100), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('previous', sa.String(length=64), nullable=True),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('overrides', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('prompt_deploys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_prompt_deploys_name'), ['name'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('prompt_deploys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_prompt_deploys_name'))
    op.drop_table('prompt_deploys')
    with op.batch_alter_table('prompt_labels', schema=None) as batch_op:
        batch_op.drop_column('overrides')
        batch_op.drop_column('author')
        batch_op.drop_column('note')
