# The stand-in base image (see base_image.sh): Debian 12 from debootstrap with the image's Python, torch and
# torchvision, to which this adds the environment RunPod's base images set.
FROM localhost/worker-transformers-rootfs:stand-in

# pip vendors its own CA bundle; point it and requests at the system one, which holds this machine's CAs.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# What RunPod's pytorch images set and the project's Dockerfile must cope with.
ENV PYTHONUNBUFFERED=True \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_CACHE_DIR=/workspace/.cache/pip/ \
    HF_HOME=/workspace/.cache/huggingface/ \
    HF_XET_HIGH_PERFORMANCE=1

RUN python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

CMD ["/bin/bash"]
