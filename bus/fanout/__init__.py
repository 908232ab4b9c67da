"""The fan-out stage: bus events -> agent streaming protocol events in trace and thread history."""
