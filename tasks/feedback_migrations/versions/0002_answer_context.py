"""answers keep the retrieved passages as the prompt held them (a correction becomes a row with the same context)

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("answers") as batch:
        batch.add_column(sa.Column("context", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("answers") as batch:
        batch.drop_column("context")
