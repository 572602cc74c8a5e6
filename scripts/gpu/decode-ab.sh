source .gpu/device-env.sh; for f in .gpu/*.gz; do gunzip -kf $f; chmod +x ${f%.gz}; done
./.gpu/ops fused_decode --test-threads 1 --nocapture 2>&1 | grep -E "fused decode|test result|panicked|assert"
./.gpu/ops cuda --test-threads 1 2>&1 | tee $OUT/ops_tests.log | tail -2
python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > $OUT/make-random.log 2>&1
B() { ./.gpu/lorafuse bench decode --device cuda --prompt-tokens 32 --new-tokens 128 --repeat 3 "$@" 2>/dev/null | python3 -c "import sys,json; d=json.loads(sys.stdin.read()); print(d['model'].split('/')[-1], d['dtype'], d['decode_path'], d['prompt_tokens'], d['new_tokens'], round(d['tokens_per_s'],1), [round(x) for x in d['runs_tokens_per_s']])"; }
B --model /tmp/rand/smollm2 --dtype bf16 --json $OUT/decode_bf16.json
B --model /tmp/rand/smollm2 --dtype f32 --json $OUT/decode_f32.json
LORAFUSE_PDL=0 B --model /tmp/rand/smollm2 --dtype bf16 --json $OUT/decode_bf16_nopdl.json
LORAFUSE_CUDA_GRAPH=0 B --model /tmp/rand/smollm2 --dtype bf16 --json $OUT/decode_bf16_nograph.json
LORAFUSE_FUSED_DECODE=0 B --model /tmp/rand/smollm2 --dtype bf16 --json $OUT/decode_bf16_candle.json
B --model /tmp/rand/smollm2 --dtype bf16 --prompt-tokens 512 --new-tokens 512 --json $OUT/decode_bf16_long.json
B --model /tmp/rand/qwen05b --dtype bf16 --json $OUT/decode_bf16_qwen05b.json
