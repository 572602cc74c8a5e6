#!/usr/bin/env bash
# Session 7, second attention A/B: the backward's dQ as 8-byte reductions straight from the
# accumulator pairs (no lane swaps) against the build before (.gpu-ab/lorafuse-base.gz: the
# forward's tree maxima, the 16-byte swapped dQ reductions), alternating, with SDPA in the same
# call; then the CUDA op tests and PC sampling of the new kernels. Same steps as the first A/B.
R=/tmp/s7ab2 exec bash "$(dirname "$0")/session7-att-ab.sh"
