"""Who is asking: API keys (stored as HMACs) and trusted headers -> tenant and workflow."""
