"""The HTTP routes, one APIRouter per endpoint family; heron/server/app.py includes them all.

Each route parses its body through the ServerContext (heron/server/context.py), prepares the work
in its serving module, and sends generation answers through `ServerContext.answer()`.
"""

from heron.server.routes import chat, completions, embeddings, messages, models, rerank, responses, service, tokenize

ROUTERS = (chat.router, completions.router, responses.router, messages.router, embeddings.router, rerank.router, models.router, tokenize.router, service.router)
