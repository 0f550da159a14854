#!/usr/bin/env bash
# Builds the browser client: the engine to wasm, then its JS bindings into web/dist/pkg.
# Needs the wasm32-unknown-unknown target and wasm-bindgen-cli of exactly the wasm-bindgen
# version in Cargo.lock (.ci/run installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p sealpost-web --target wasm32-unknown-unknown
wasm-bindgen --target web --no-typescript --out-dir web/dist/pkg \
  target/wasm32-unknown-unknown/release/sealpost_web.wasm
echo "built web/dist (serve it with: sealpost serve --web-root web/dist, then open /web/)"
