"""The obvious query every client test ranks: the document at ``BEST`` answers it."""

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are a good source of potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market fell sharply on Monday.",
]
BEST = 1
