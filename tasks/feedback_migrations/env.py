"""alembic environment of the feedback store: migrations run on the connection FeedbackStore hands over."""
from alembic import context

from culbot.tasks.feedback_store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)   # batch: SQLite alters by copy
with context.begin_transaction():
    context.run_migrations()
