# Shared by the launch scripts (sourced, not run): errors with the usage line, and
# shell quoting for printing commands exactly. The sourcing script defines PROG,
# HELP_CMD and usage() first.
# shellcheck shell=bash

die() {
  echo "${PROG}: error: $*" >&2
  usage | sed -n '/^Usage:/,/^$/p' >&2  # The usage lines.
  echo "Run '${HELP_CMD} --help' for details." >&2
  exit 2
}

# One shell word: as it is when that is safe, single-quoted otherwise.
quote() {
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command line, properly quoted.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}
