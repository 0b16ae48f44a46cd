"""lifecycle: call ids and arms in the call log, feedback, shadow answers, rollouts, promotions

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('call_logs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('call_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('arm', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('candidate', sa.String(length=300), nullable=True))
        batch_op.create_index(batch_op.f('ix_call_logs_call_id'), ['call_id'], unique=True)

    op.create_table('call_feedback',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('call_id', sa.String(length=64), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('correction', sa.Text(), nullable=True),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('call_feedback', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_call_feedback_call_id'), ['call_id'], unique=False)

    op.create_table('shadow_calls',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('call_id', sa.String(length=64), nullable=False),
    sa.Column('deployment', sa.String(length=300), nullable=False),
    sa.Column('candidate', sa.String(length=300), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('output', sa.Text(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('latency_s', sa.Float(), nullable=False),
    sa.Column('cost', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('shadow_calls', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_shadow_calls_call_id'), ['call_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_shadow_calls_deployment'), ['deployment'], unique=False)
        batch_op.create_index(batch_op.f('ix_shadow_calls_created_at'), ['created_at'], unique=False)

    op.create_table('rollouts',
    sa.Column('deployment', sa.String(length=300), nullable=False),
    sa.Column('primary', sa.String(length=300), nullable=True),
    sa.Column('canary', sa.String(length=300), nullable=True),
    sa.Column('canary_weight', sa.Float(), nullable=False),
    sa.Column('sticky', sa.Boolean(), nullable=False),
    sa.Column('shadow', sa.String(length=300), nullable=True),
    sa.Column('shadow_share', sa.Float(), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('deployment')
    )
    op.create_table('promotions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('deployment', sa.String(length=300), nullable=False),
    sa.Column('action', sa.String(length=20), nullable=False),
    sa.Column('from_candidate', sa.String(length=300), nullable=False),
    sa.Column('to_candidate', sa.String(length=300), nullable=False),
    sa.Column('gate', sa.JSON(), nullable=False),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('promotions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_promotions_deployment'), ['deployment'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('promotions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_promotions_deployment'))
    op.drop_table('promotions')
    op.drop_table('rollouts')
    with op.batch_alter_table('shadow_calls', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_shadow_calls_created_at'))
        batch_op.drop_index(batch_op.f('ix_shadow_calls_deployment'))
        batch_op.drop_index(batch_op.f('ix_shadow_calls_call_id'))
    op.drop_table('shadow_calls')
    with op.batch_alter_table('call_feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_call_feedback_call_id'))
    op.drop_table('call_feedback')
    with op.batch_alter_table('call_logs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_call_logs_call_id'))
        batch_op.drop_column('candidate')
        batch_op.drop_column('arm')
        batch_op.drop_column('call_id')
