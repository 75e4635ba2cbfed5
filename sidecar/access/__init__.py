"""Who may see what: access rules on claims, and the identity headers of a session."""
