"""Users, vhosts, permissions, tokens, access keys and ACLs: one model for every protocol."""
