"""SQS benchmark: Conveyor's SQS listener beside moto server (bench/sqs/run.py)."""
