#!/bin/sh
# acme.sh's --reloadcmd, where the legacy package kept it: so that renewals set up for the
# legacy server keep working after the upgrade. acme.sh writes the renewed key in plain PEM
# to server.key.pem; this puts it where serverKeyFile points, encrypted as PKCS#8 with
# serverKeyPassword as the legacy server required (plain when the password is empty), then
# asks the server to reload. The password goes to openssl in the environment, never on a
# command line.
set -eu
dir=${KMS_CONFIG_DIR:-/etc/talos-kms-server}
reload=${KMS_RELOAD_COMMAND:-systemctl reload talos-kms-server}
password=$(sed -n 's/^serverKeyPassword:[[:space:]]*"\{0,1\}\([^"#]*\)"\{0,1\}.*$/\1/p' \
  "$dir/config.yaml" | head -n 1 | sed 's/[[:space:]]*$//')
umask 077
if [ -n "$password" ]; then
  KMS_KEY_PASSWORD=$password openssl pkcs8 -topk8 -v2 aes-256-cbc \
    -passout env:KMS_KEY_PASSWORD -in "$dir/server.key.pem" -out "$dir/server.key.new"
else
  cp "$dir/server.key.pem" "$dir/server.key.new"
fi
chgrp talos-kms "$dir/server.key.new" 2>/dev/null && chmod 0640 "$dir/server.key.new"
mv "$dir/server.key.new" "$dir/server.key"
$reload
