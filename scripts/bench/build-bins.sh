# Sourced by the hub benchmarks: builds the hub and the agent (PROFILE=release
# by default, or debug) and sets `profile`.
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --release --quiet -p nodekeeper-hub -p nodekeeper-agent
else
  cargo build --quiet -p nodekeeper-hub -p nodekeeper-agent
fi
