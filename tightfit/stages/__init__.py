"""Pipeline stages: one module each, typed artifacts in and out, never importing each other."""
