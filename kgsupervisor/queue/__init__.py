"""The leased queue: claiming rows, building the request, writing the answer back."""
