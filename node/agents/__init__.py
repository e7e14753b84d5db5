"""Agents: the user's `@mirador.agent` classes woken by schedules, events and thresholds (issue 17)."""
