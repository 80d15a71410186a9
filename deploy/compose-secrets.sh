#!/usr/bin/env bash
# Creates the Docker secrets docker-compose.yml reads, in ./secrets/ (or the folder
# given as the first argument): management_token, encryption_key, postgres_password
# and pgpass (the same password in PostgreSQL's password-file format, for the
# proxies' PGPASSFILE).
#
# A secret that already exists is kept, never replaced: ENCRYPTION_KEY decrypts the
# stored upstream keys, so a new one would lock the proxies out of the database.
# Every file is created with mode 0600. Run as root, the proxies' files are given to
# the image's user (UID 10001), the only one that must read them inside the
# containers; PostgreSQL reads its password as root.
set -euo pipefail

dir="${1:-secrets}"
PROXY_UID=10001
umask 077
mkdir -p "$dir"

# write_once NAME VALUE: writes VALUE to NAME unless NAME already holds something.
write_once() {
    local path="$dir/$1"
    if [[ -s "$path" ]]; then
        echo "kept    $path"
        return 0
    fi
    printf '%s\n' "$2" >"$path"
    echo "created $path"
}

write_once management_token "$(openssl rand -hex 32)"
write_once encryption_key "$(openssl rand -base64 32)"
write_once postgres_password "$(openssl rand -hex 24)"
# host:port:database:user:password, for the DATABASE_URL of docker-compose.yml.
write_once pgpass "postgres:5432:llmproxy:llmproxy:$(head -n 1 "$dir/postgres_password")"

proxy_files=("$dir/management_token" "$dir/encryption_key" "$dir/pgpass")
chmod 600 "$dir"/*
if [[ $(id -u) -eq 0 ]]; then
    chown "$PROXY_UID:$PROXY_UID" "${proxy_files[@]}"
else
    echo "not root: run  sudo chown $PROXY_UID:$PROXY_UID ${proxy_files[*]}"
    echo "so that the proxies (UID $PROXY_UID in the image) can read them"
fi
