"""The Amazon SQS API (AWS JSON 1.0 and the query/XML protocol) over the broker facade."""
