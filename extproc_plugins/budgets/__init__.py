"""Budgets and rate limits: windows, reservations, leased blocks of budget."""
