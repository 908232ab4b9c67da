"""The app side: the LangChain callback handler and the publisher that moves its events to Redis."""
