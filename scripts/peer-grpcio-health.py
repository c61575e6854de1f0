#!/usr/bin/env python3
"""Peer for the one-hop benchmark: a gRPC health server in Python grpcio (gRPC C-core), answering SERVING.

Usage: peer-grpcio-health.py PORT [WORKERS]   (pip install grpcio grpcio-health-checking)
"""
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def main():
    port = int(sys.argv[1])
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"grpcio health server on {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
