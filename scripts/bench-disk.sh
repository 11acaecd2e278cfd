#!/usr/bin/env bash
# Placeholder until its issue lands.
echo "bench-disk: not built yet"
