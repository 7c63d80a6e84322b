"""The database schema: migrate applies the top-level sql/ scripts (shipped inside the
package as bmsd/sql); aggregates generates the continuous aggregates' script."""
