"""Built-in policies of llm-extproc, one package per family (routing, caching, budgets, tenancy,
context, observability, admin); each family's README lists its plugins and helpers.

Every plugin is registered through the ``extproc.plugins`` entry-point group declared in this
project's ``pyproject.toml``, the same way a third-party plugin package registers its own. Families
never import each other (an import-linter contract); they cooperate through the request context.
"""
