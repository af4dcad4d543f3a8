"""Bridges to other attribution libraries (Captum)."""
