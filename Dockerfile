# The filter as the OCI image Istio pulls (WasmPlugin / TrafficExtension `url: oci://...`):
# nothing but the module, named plugin.wasm, in a single layer.
#
#   make wasm
#   docker build -t REGISTRY/idempotency-filter:0.1.0 .
#   docker push REGISTRY/idempotency-filter:0.1.0
#
# Without Docker, `make image` writes the same image as an OCI layout and archive under
# target/oci/ (tools/oci_image.py), ready for `skopeo copy` or `crane push`.
FROM scratch
COPY target/wasm32-wasip1/release/idempotency_filter.wasm ./plugin.wasm
