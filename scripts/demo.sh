#!/usr/bin/env bash
# Placeholder until its issue lands.
echo "demo: not built yet"
