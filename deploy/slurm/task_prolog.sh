#!/bin/sh
# Slurm TaskProlog: gives every job's tasks the ledger's address and a node-local spool.
# slurm.conf:  TaskProlog=/etc/slurm/task_prolog.sh
# Slurm runs it as the job's user before each task; each "export NAME=value" line
# it prints lands in the task's environment. A job that sets its own value keeps it.
[ -n "$LEDGER_NATS_URL" ] || echo "export LEDGER_NATS_URL=nats://ledger.example.org:4222"
# with roles (CONTRACT section 7): a `job` key readable by the users who submit jobs
# [ -n "$LEDGER_NATS_CREDS" ] || echo "export LEDGER_NATS_CREDS=/etc/run-ledger/job.nk"
# events wait here while NATS is away; `ledger sync` on the node sends what a job left behind
[ -n "$LEDGER_SPOOL" ] || echo "export LEDGER_SPOOL=/var/tmp/run-ledger-$(id -u).db"
