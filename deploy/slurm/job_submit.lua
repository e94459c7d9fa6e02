--[[ Slurm job_submit plugin: record every shell batch job with `ledger run`.

slurm.conf:    JobSubmitPlugins=lua
This file:     job_submit.lua next to slurm.conf (e.g. /etc/slurm/job_submit.lua)
Then:          scontrol reconfigure

A batch script run by sh/bash/zsh/ksh gets one line after its #! line: the script
re-executes itself under `ledger run` once, so the whole job is one run named after
it (slurm-<cluster>-<job id>). A script that calls `ledger run` itself, or has another
interpreter (python, ...), is left as it is. Pair it with task_prolog.sh so that every
job knows where the ledger is.
]]

local LEDGER = "/opt/run-ledger/bin/ledger"
local SHELLS = { sh = true, bash = true, zsh = true, ksh = true, dash = true }
local WRAP = 'if [ "${LEDGER_WRAPPED_JOB:-}" != "$SLURM_JOB_ID" ]; then '
          .. 'export LEDGER_WRAPPED_JOB="$SLURM_JOB_ID"; exec ' .. LEDGER .. ' run -- "$0" "$@"; fi'
          .. '  # added by job_submit.lua (run-ledger)\n'

local function interpreter(first_line)
    local words = {}
    for word in first_line:gmatch("%S+") do words[#words + 1] = word end
    local program = (words[1] or ""):gsub("^#!", "")
    if program == "" then program = words[2] or "" end
    local name = program:match("[^/]+$") or ""
    if name == "env" then
        for i = 2, #words do
            if words[i] ~= "#!" and not words[i]:match("^%-") and not words[i]:match("/env$") then
                return words[i]
            end
        end
    end
    return name
end

function slurm_job_submit(job_desc, part_list, submit_uid)
    local script = job_desc.script
    if script == nil or script:find("ledger run", 1, true) then
        return slurm.SUCCESS
    end
    local first, rest = script:match("^(#![^\n]*\n)(.*)$")
    if first == nil or not SHELLS[interpreter(first)] then
        return slurm.SUCCESS
    end
    job_desc.script = first .. WRAP .. rest
    return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    return slurm.SUCCESS
end

return slurm.SUCCESS
