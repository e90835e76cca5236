#!/bin/sh
# keel: encrypt the recovery key on standard input to the operator's recovery key ($1, PEM;
# RSA-OAEP with SHA-256) and print the escrow file (src/trust/escrow.rs reads it; the operator
# runs `keel keys recover`). Nothing but the ciphertext leaves this script.
set -eu
pub=$1
[ -r "$pub" ] || { echo "keel-escrow: no recovery key $pub in the image" >&2; exit 1; }
fp=$(openssl pkey -pubin -in "$pub" -outform DER | openssl dgst -sha256 -r | cut -d' ' -f1)
ct=$(openssl pkeyutl -encrypt -pubin -inkey "$pub" -pkeyopt rsa_padding_mode:oaep \
    -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256 | openssl base64 -A)
[ -n "$ct" ] || { echo "keel-escrow: encryption gave nothing" >&2; exit 1; }
printf '{\n  "format": "keel-recovery-escrow/1",\n  "key": "sha256:%s",\n  "rsa-oaep-sha256": "%s"\n}\n' "$fp" "$ct"
