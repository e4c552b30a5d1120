# The one image of Trellis: trellis-control-plane and trellis-proxy, built in a Rust
# stage and shipped on a slim base with iptables (nft and legacy), which the
# injected init step (`trellis-proxy init`) runs. The chart and the injector call
# both binaries by name; they run as the users the pod specs set (the control
# plane 65532, the proxy 1337, the init step root with NET_ADMIN and NET_RAW only).
#
#   docker build -t ghcr.io/trellis-mesh/trellis:0.1.0 .

# The toolchain proxy/symbol-order.txt was written with: its symbol names are
# this rustc's (benches/symbol-order).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The protobuf code is generated ahead of time: no protoc is needed. The proxy is built on
# its own: built with the control plane, it would carry the features the control
# plane turns on in shared crates (all of tokio's, tracing's log bridge), 0.4 MB
# more code and 0.3-0.5 MiB more resident memory in every sidecar. Its profile,
# sidecar, optimises it as one unit (Cargo.toml).
RUN cargo build --release --locked -p trellis-control-plane --bins \
 && cargo build --profile sidecar --locked -p trellis-proxy --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/sidecar/trellis-proxy /src/target/release/trellis-control-plane /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["trellis-control-plane"]
