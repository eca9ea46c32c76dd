"""Training pieces shared by master and workers: models, data sets, plug-ins, sampler, flat buffers,
optimizers, the local trainer."""
