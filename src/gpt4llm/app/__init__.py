"""What every command shares: where the configs are, console logging, config resolvers and checks."""
