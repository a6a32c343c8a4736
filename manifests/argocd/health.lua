-- Argo CD health of a npuswarm.io ModelDeployment or ModelGateway, from the status npuswarm writes
-- (status.py, gateway.py: the same conditions). Installed by argocd-cm-patch.yaml, which embeds it.
-- Argo CD runs custom checks without Lua's string and math libraries: only base functions
-- and `..` here.
local hs = {}

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "being deleted: npuswarm's finalizer is removing its Swarm services"
  return hs
end

local status = obj.status
-- The API server serves observedGeneration 0 (the CRD's status default) until npuswarm's first
-- write: generations start at 1, so 0 means never observed.
if status == nil or status.observedGeneration == nil or status.observedGeneration == 0 then
  hs.status = "Progressing"
  hs.message = "waiting for the operator"
  return hs
end

local generation = obj.metadata.generation

-- Anything reported for an older generation says nothing about the spec Argo CD just
-- applied: a Ready from before the change must not turn a new sync green.
local function current(item)
  return generation == nil or item.observedGeneration == generation
end

local function text(condition)
  if condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return condition.reason or ""
end

if not current(status) then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. tostring(generation)
    .. " (last observed " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type ~= nil and current(condition) then
      conditions[condition.type] = condition
    end
  end
end

-- The first condition that is True decides, in this order of precedence.
local verdicts = {{"Degraded", "Degraded"}, {"Ready", "Healthy"}, {"Progressing", "Progressing"}}
for _, verdict in ipairs(verdicts) do
  local condition = conditions[verdict[1]]
  if condition ~= nil and condition.status == "True" then
    hs.status = verdict[2]
    hs.message = text(condition)
    return hs
  end
end

local ready = conditions["Ready"]
-- No verdict for this generation yet (conditions missing, or written for an older one).
hs.status = "Progressing"
if ready ~= nil then
  hs.message = text(ready)
else
  hs.message = "waiting for the operator to report on generation " .. tostring(generation)
end
return hs
