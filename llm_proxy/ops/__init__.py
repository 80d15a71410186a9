"""Operations endpoints: /health, /live and /ready, and the readiness checks."""
