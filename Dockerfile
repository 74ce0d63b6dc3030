# The image the Argo and Airflow pipelines run (pipelines/). Build it where a Docker engine is
# available (these development machines have none):  docker build -t btu:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY bench bench
COPY schemas schemas
RUN cargo build --release --locked --bin btu

FROM python:3.11-slim-bookworm
# ONNX Runtime from its PyPI wheel: btu loads libonnxruntime.so at run time (ort load-dynamic).
RUN pip install --no-cache-dir --no-deps onnxruntime==1.31.1 \
    && ln -s "$(python -c 'import onnxruntime, pathlib; print(next(pathlib.Path(onnxruntime.__file__).parent.glob("capi/libonnxruntime.so.*")))')" /usr/local/lib/libonnxruntime.so
ENV ORT_DYLIB_PATH=/usr/local/lib/libonnxruntime.so
COPY --from=build /src/target/release/btu /usr/local/bin/btu
USER 1000
ENTRYPOINT ["btu"]
