"""The running proxy: twistd options, the Service's lifecycle, shared proxy state, reload, drain and logs."""
