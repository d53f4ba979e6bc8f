-- Argo CD health check for ckpt.dev/TrainingJob. Install it in argocd-cm:
--   data:
--     resource.customizations.health.ckpt.dev_TrainingJob: |
--       <this file>
-- Progressing while the job runs, is preempted or waits to be resubmitted; Healthy once it succeeded; Degraded when
-- it failed; Suspended while spec.suspend holds it. A status older than the spec is Progressing (not acted on yet).
hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the ckpt-operator"
if obj.status == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "The operator has not acted on the latest spec yet"
  return hs
end
local function condition(kind)
  if obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == kind then
        return c
      end
    end
  end
  return nil
end
local phase = obj.status.phase or "Pending"
local attempt = obj.status.attempt or 0
local preemptions = obj.status.preemptions or 0
local step = "no checkpoint yet"
if obj.status.lastCheckpoint ~= nil and obj.status.lastCheckpoint.step ~= nil then
  step = "checkpoint step " .. obj.status.lastCheckpoint.step
end
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Training finished (" .. step .. ", " .. preemptions .. " preemption(s))"
elseif phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition("Failed")
  hs.message = (failed ~= nil and failed.message) or obj.status.message or "Failed"
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended (" .. step .. ")"
else
  hs.status = "Progressing"
  local running = condition("Running")
  local why = ""
  if running ~= nil and running.status == "False" and running.message ~= nil and running.message ~= "" then
    why = ": " .. running.reason .. ": " .. running.message
  end
  hs.message = phase .. ", attempt " .. attempt .. ", " .. preemptions .. " preemption(s), " .. step .. why
end
return hs
