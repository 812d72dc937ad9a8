-- channel_permissions: a member receives a channel's events only when they may
-- see the channel (Discord's VIEW_CHANNEL), computed the way Discord does:
--
--   base   = @everyone's permissions | the member's roles' permissions
--            (everything, when the member owns the guild or has ADMINISTRATOR)
--   then the channel's overwrites, in order:
--     @everyone's overwrite (deny, then allow),
--     all the member's roles' overwrites together (deny, then allow),
--     the member's own overwrite (deny, then allow).
--
-- Where the data comes from:
--   subscription context (set by the gateway from the member's state; a role
--   change is an UpdateContext, effective from the next event):
--     guild_id          the guild (its id is also the @everyone role's id)
--     user_id           the member
--     roles             the member's role ids, comma-separated
--     role_permissions  "role_id:bits,..." for @everyone and every role of the member
--     owner             "true" when the member owns the guild
--   event headers (set by the chat API on channel-scoped events):
--     channel_id        the channel; events without it are guild-wide and pass
--     overwrites        the channel's overwrites, "id:allow:deny,..." (role or member ids)
--
-- Permission bits are decimal 64-bit integers.

-- Globals resolve through the sandbox's environment chain; locals do not.
local ipairs, tonumber, gmatch, tointeger = ipairs, tonumber, string.gmatch, math.tointeger

local VIEW_CHANNEL = 1 << 10
local ADMINISTRATOR = 1 << 3

local function parse_pairs(text)
  local map = {}
  for id, bits in gmatch(text or "", "([^:,]+):(%d+)") do
    map[id] = tointeger(tonumber(bits)) or 0
  end
  return map
end

local function parse_overwrites(text)
  local map = {}
  for id, allow, deny in gmatch(text or "", "([^:,]+):(%d+):(%d+)") do
    map[id] = { allow = tointeger(tonumber(allow)) or 0, deny = tointeger(tonumber(deny)) or 0 }
  end
  return map
end

-- Members whose verdict can differ only by their own overwrite share a "shape":
-- the guild, the base permissions and the role list. Shapes are numbered (numbers
-- are cheaper keys than strings); a number is never reused for another shape.
-- Ids are compared as the exact text given (as `named` reports them).
local shapes, shape_count, next_shape = {}, 0, 1
local function shape_of(guild, base, roles_text, sees_all)
  -- Length-prefixed, so no two shapes have the same key whatever the ids hold.
  local key = #guild .. ":" .. guild .. #roles_text .. ":" .. roles_text .. base
    .. (sees_all and "A" or "N")
  local shape = shapes[key]
  if shape == nil then
    if shape_count >= 100000 then
      shapes, shape_count = {}, 0 -- bounded: older members just share less
    end
    shape, next_shape, shape_count = next_shape, next_shape + 1, shape_count + 1
    shapes[key] = shape
  end
  return shape
end

-- What depends on the member only is computed once per context and kept in the
-- context table (which lives as long as the context); what every call needs (the
-- shape and the member's id) also in the subscription table, which lives as long
-- and is smaller (fewer memory reads per call when members are many).
local function member_of(subscription)
  local context = subscription.context
  local role_permissions = parse_pairs(context.role_permissions)
  local roles = {}
  for role in gmatch(context.roles or "", "[^,]+") do
    roles[#roles + 1] = role
  end
  local guild = context.guild_id or ""
  local base = role_permissions[guild] or 0
  for role in gmatch(context.roles or "", "[^,]+") do
    base = base | (role_permissions[role] or 0)
  end
  local sees_all = context.owner == "true" or base & ADMINISTRATOR ~= 0
  context._guild = guild
  context._roles = roles
  context._base = base
  context._sees_all = sees_all
  context._user = context.user_id or ""
  local shape = shape_of(guild, base, context.roles or "", sees_all)
  subscription._shape = shape
  subscription._user = context._user
  return shape
end

local function judge(context, overwrites)
  if context._sees_all then
    return true
  end
  local permissions = context._base
  local everyone = overwrites[context._guild]
  if everyone then
    permissions = (permissions & ~everyone.deny) | everyone.allow
  end
  local allow, deny = 0, 0
  for _, role in ipairs(context._roles) do
    local overwrite = overwrites[role]
    if overwrite then
      allow = allow | overwrite.allow
      deny = deny | overwrite.deny
    end
  end
  permissions = (permissions & ~deny) | allow
  local own = overwrites[context._user]
  if own then
    permissions = (permissions & ~own.deny) | own.allow
  end
  return permissions & VIEW_CHANNEL ~= 0
end

-- What depends on the event only is computed once per event and kept in the event
-- table, with the verdicts of the shapes judged so far.
local function channel_of(event)
  local channel = false -- guild-wide events (no channel) pass
  if event.headers.channel_id ~= nil then
    channel = { overwrites = parse_overwrites(event.headers.overwrites), by_shape = {} }
  end
  event._channel = channel
  return channel
end

local function filter(event, subscription)
  local channel = event._channel
  if channel == nil then
    channel = channel_of(event)
  end
  if not channel then
    return true
  end
  local shape = subscription._shape or member_of(subscription)
  local overwrites = channel.overwrites
  if overwrites[subscription._user] then
    return judge(subscription.context, overwrites) -- the member's own overwrite
  end
  local by_shape = channel.by_shape
  local verdict = by_shape[shape]
  if verdict == nil then
    verdict = judge(subscription.context, overwrites)
    by_shape[shape] = verdict
  end
  return verdict
end

-- A member's own id matters only when the channel has an overwrite for it: for the
-- other members, the broker judges their context without `user_id` once, and every
-- member of the same roles and permissions shares that verdict. `named` lists the
-- ids the channel's overwrites name (roles too: naming more only shares less).
local function named(event)
  local ids = {}
  for id in gmatch(event.headers.overwrites or "", "([^:,]+):%d+:%d+") do
    ids[#ids + 1] = id
  end
  return ids
end

return { filter = filter, share = { field = "user_id", named = named } }
