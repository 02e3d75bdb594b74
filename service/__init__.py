"""procbridge's asyncio side: HTTP, validation, metrics and the app factory (`create_app`)."""
