#!/usr/bin/env bash
# Placeholder until its issue lands.
echo "bench-fscore: not built yet"
