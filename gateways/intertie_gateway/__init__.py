"""The Intertie site gateway."""
