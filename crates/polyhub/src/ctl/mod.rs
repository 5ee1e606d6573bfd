//! `polyhub hub|device|group|telemetry|...`: the command line as a client of the REST API.
//! (Being written.)
