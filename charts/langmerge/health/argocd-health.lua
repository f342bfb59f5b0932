-- Argo CD health check for langmerge.dev LanguageExpert and MergedModel (one script for both kinds).
-- Install it as resource.customizations.health.langmerge.dev_LanguageExpert and ..._MergedModel in argocd-cm
-- (see argocd-cm-patch.yaml next to this file and the chart README). Lua 5.1 (gopher-lua); no libraries needed.
--
-- Order of the checks:
--   1. no status, or status.observedGeneration (or the Ready condition's) behind metadata.generation -> Progressing
--      (the operator has not yet looked at the current spec; its conditions describe an older one);
--   2. phase Suspended (spec.suspend)                                                                 -> Suspended;
--   3. QualityGate False (a MergedModel whose latest merge regressed; the previous revision stays published),
--      Degraded True (invalid spec, failed training or merge, inputs or S3 missing), or phase Failed  -> Degraded;
--   4. Ready True                                                                                     -> Healthy;
--   5. anything else (pending, training, waiting for experts, merging)                                -> Progressing.
local hs = {}

local function find_condition(conditions, condition_type)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == condition_type then
      return condition
    end
  end
  return nil
end

local function message_of(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition ~= nil and condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return fallback
end

local function behind(observed, generation)
  return generation ~= nil and (observed == nil or observed < generation)
end

local status = obj.status
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the langmerge operator to reconcile"
  return hs
end

if behind(status.observedGeneration, generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (status is for generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local conditions = status.conditions
local ready = find_condition(conditions, "Ready")
local degraded = find_condition(conditions, "Degraded")
local gate = find_condition(conditions, "QualityGate")

if ready ~= nil and ready.observedGeneration ~= nil and behind(ready.observedGeneration, generation) then
  hs.status = "Progressing"
  hs.message = "The Ready condition is for generation " .. tostring(ready.observedGeneration) ..
    ", the spec is at generation " .. tostring(generation)
  return hs
end

if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(ready, status.message or "spec.suspend is true")
  return hs
end

if gate ~= nil and gate.status == "False" then
  hs.status = "Degraded"
  hs.message = "Quality gate: " .. message_of(gate, "the latest merge regressed")
  if status.revision ~= nil then
    hs.message = hs.message .. " (revision " .. tostring(status.revision) .. " stays published)"
  end
  return hs
end

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = message_of(degraded, "Degraded")
  return hs
end

if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = status.message or message_of(ready, "Failed")
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(ready, "Ready")
  return hs
end

hs.status = "Progressing"
if status.message ~= nil and status.message ~= "" then
  hs.message = status.message
else
  hs.message = message_of(ready, "Phase " .. tostring(status.phase or "Pending"))
end
return hs
